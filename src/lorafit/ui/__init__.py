"""`lorafit ui`: the local web app (server.py) and what its views read and do."""
