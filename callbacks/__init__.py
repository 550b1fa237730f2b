"""Lightning and Hydra callbacks: behaviour attached through hooks, state through state_dict."""
