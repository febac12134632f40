"""`tidemind serve proxy`: one OpenAI-compatible endpoint in front of several api_servers.

launch.py holds the command line (light imports); app.py the FastAPI app; forward.py forwarding;
security.py access checks and the body size limit; nodes.py the node table and health checks;
routing.py the routing strategies and session affinity.

The constants below are shared by the command lines of the proxy and of the api_server, which must
not import the proxy's web stack to build their parsers.
"""

# Read by the proxy's --registration-key and the api_server's --proxy-registration-key, so that the
# key need not appear on a command line (where `ps` shows it to every user of the machine).
REGISTRATION_KEY_ENV = "TIDEMIND_PROXY_REGISTRATION_KEY"

# Bounds what the proxy holds per request: it reads a body whole (to route on its `model` and to
# resend it to another node when the first could not take it). 8 MiB is about ten times a
# 128k-token prompt, as text or as token ids.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
