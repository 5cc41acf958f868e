"""diffferv: edit faces in real videos with a diffusion model (DiffFERV)."""

__version__ = "0.1.0"
