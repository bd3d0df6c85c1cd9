"""Graph passes of the compiler, one analysis or rewrite per module (installed as cocompile.passes)."""
