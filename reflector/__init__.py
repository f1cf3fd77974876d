"""The Device Manager and its Reflector, the client library and the command line."""
