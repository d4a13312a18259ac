"""RSP's fusable steps: ``reference`` (pure PyTorch, the specification)."""
