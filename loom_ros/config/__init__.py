"""Loading Loom's configuration: node parameter defaults from config/*.yaml."""
