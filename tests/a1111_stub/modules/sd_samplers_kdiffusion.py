"""Stand-in: present in A1111 and both Forge lines (the extension's host probe imports it)."""
