"""vitserve's front doors: the gRPC services (vitserve.v1, KServe v2), auth, metrics, settings and the data plane."""
