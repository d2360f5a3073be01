"""HTTP only: the app, routes, schemas, authentication, the spec, the uvicorn protocol."""
