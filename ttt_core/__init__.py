"""TTT Lens computational core.

Everything that computes lives here (DESIGN.md §1): model loading and the per-head adapter,
prompt parsing and generators, the spectral theory of TTT (§3-§5), evidence kernels and block
scores (§2, §6), and the qTTT engine (§7.2). Nothing in this package imports Streamlit.
"""

__version__ = "0.1.0"
