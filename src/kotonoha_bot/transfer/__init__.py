"""The migrate / verify / upgrade / backup / restore tool, beside the runtime storage.

``kotonoha db …`` runs it; the bot itself reads only :mod:`~kotonoha_bot.transfer.marker`
(it refuses a half-migrated database) and schedules
:func:`~kotonoha_bot.transfer.backup.run_backup`.
It works below the contract, on raw rows (``db/tables.py`` says what the tables are;
each backend's ``rows`` module moves them), and reaches a backend only through its
registered :class:`~kotonoha_bot.transfer.endpoints.Endpoint`.

- ``endpoints.py`` the Endpoint protocol and registry; ``sqlite.py``, ``postgres.py`` the two
- ``copy.py`` migrate; ``verify.py`` compare, verify, checksums; ``upgrade.py`` legacy in place
- ``rowconv.py`` raw row -> canonical row (or a rejection); ``legacy.py`` the pre-ADR-0007 format
- ``backup.py`` backup/rotate/restore; ``files.py`` backup file names; ``marker.py`` the marker
- ``reports.py`` what each step reports; ``quarantine.py`` the rejected rows; ``common.py`` helpers

Nothing here is imported by the package itself, so importing the marker stays cheap.
"""
