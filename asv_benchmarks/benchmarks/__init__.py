"""asv benchmark suites for ltroute (see ``asv_benchmarks/asv.conf.json``)."""
