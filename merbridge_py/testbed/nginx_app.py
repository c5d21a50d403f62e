"""nginx as a pod's app, for benchmarks: the Python app costs hundreds of
microseconds of CPU per request, which would hide the mesh's own cost. Serves
`/` and `/whoami` (the same JSON as the Python app) on every port of the pod."""

from __future__ import annotations

from pathlib import Path

CONF = """\
worker_processes 1;
pid {pid};
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
{servers}
}}
"""
# One server per family: the IPv6 one writes its peer as "[ip]:port", as the Python app does.
SERVER = """\
  server {{
{listens}
    location = /whoami {{
      default_type application/json;
      return 200 '{{"pod": "{name}", "peer": "{peer}", "port": $server_port}}';
    }}
    location / {{
      default_type text/plain;
      return 200 "hello from {name}\\n";
    }}
  }}"""


def argv(workdir: Path, name: str, ports: list[int], ready_file: Path, log: Path, ipv6: bool = False) -> list[str]:
    """Write the pod's config and return the command. nginx writes its pid
    file after it has bound every listener, so the pid file is the ready file.
    `ipv6`: also listen on [::] (a dual-stack pod)."""
    tmp = workdir / f"{name}.nginx"
    tmp.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{name}.nginx.conf"
    servers = [SERVER.format(name=name, peer="$remote_addr:$remote_port",
                             listens="\n".join(f"    listen {p};" for p in ports))]
    if ipv6:
        servers.append(SERVER.format(name=name, peer="[$remote_addr]:$remote_port",
                                     listens="\n".join(f"    listen [::]:{p} ipv6only=on;" for p in ports)))
    conf.write_text(CONF.format(pid=ready_file, tmp=tmp, servers="\n".join(servers)))
    return ["nginx", "-c", str(conf), "-e", str(log), "-g", "daemon off;"]
