"""`tidemind serve proxy`: one OpenAI-compatible endpoint in front of several api_servers.

launch.py holds the command line (light imports); app.py the FastAPI app; nodes.py the node table
and health checks; routing.py the routing strategies and session affinity.
"""
