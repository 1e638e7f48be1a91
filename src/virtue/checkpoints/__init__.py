"""Reading and writing checkpoints: the official released layout and the library's own layout."""
