"""Deployments of the flows: built here for `serve`, declared in prefect.yaml for
`prefect deploy --all` on a work pool."""
