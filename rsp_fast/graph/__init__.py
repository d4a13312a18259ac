"""Model capture: torch.fx tracing without editing the model, and the propagation plan."""
