class ConfigError(Exception):
    """Bad user input; message is one line naming the key or file."""
