REPLY = b"from a package"
