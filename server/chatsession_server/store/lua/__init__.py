"""The Lua scripts and the contract between them and the Python that runs them."""
