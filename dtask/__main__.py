from dtask.cli import entry

entry()
