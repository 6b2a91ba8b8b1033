"""The `wsikit` command line: parses arguments, calls the library, prints."""
