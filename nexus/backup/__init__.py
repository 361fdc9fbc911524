"""The password-sealed root key backup, one package for the whole concept.

- :mod:`nexus.backup.format`: the file format, sealing and opening with the password (pure
  cryptography, no I/O), and the record tags that authenticate the generation ledger;
- :mod:`nexus.backup.file`: atomic, durable storage of the encrypted bytes (and the one size
  limit, ``MAX_BACKUP_SIZE``);
- :mod:`nexus.backup.keeper`: the server's file as Nexus keeps it (parse, open, write, check,
  health).
"""
