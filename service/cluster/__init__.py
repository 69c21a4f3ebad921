"""The service on a Ray cluster (Ray Serve): imported only by ``alexnet-serve --ray`` and the
replicas it starts, so the one-host install needs no Ray (``pip install -e ".[cluster]"``)."""
