"""Applications built on `VirtueModel`: the interactive demo and serving helpers."""
