"""The server: storage, change hub, HTTP app, and the Hypercorn runner."""
