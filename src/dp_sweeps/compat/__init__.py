"""Small, tested shims for third-party packages that break on current dependencies.
Each module patches one thing, only when it is missing, and says why."""
