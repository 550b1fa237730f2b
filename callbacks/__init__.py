"""Lightning callbacks: behaviour attached to training through hooks, state through state_dict."""
