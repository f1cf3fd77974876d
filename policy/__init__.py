"""Registry files, policy derivation, signing, decisions and the audit log.  Uses neither reflector nor hosts."""
