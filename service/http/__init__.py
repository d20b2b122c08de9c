"""HTTP adapters: the ASGI app and routes, the OpenAPI document, admission control."""
