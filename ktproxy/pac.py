"""The PAC file: the routing rules of ktproxy.routing, translated to JavaScript.

Names are matched with dnsDomainIs/shExpMatch only: dnsResolve() or isInNet() on a name would make
the browser resolve it locally first, which fails for cluster names. isInNet is used on IP literals.
"""

from __future__ import annotations

import json

from ktproxy.routing import ClusterRules

CONTENT_TYPE = "application/x-ns-proxy-autoconfig"


def pac_script(rules: ClusterRules, proxy_host: str, proxy_port: int) -> str:
    proxy = f"SOCKS5 {proxy_host}:{proxy_port}; PROXY {proxy_host}:{proxy_port}"
    v4 = [[str(n.network_address), str(n.netmask)] for n in rules.cidrs if n.version == 4]
    v6 = [str(n) for n in rules.cidrs if n.version == 6]
    return f"""// ktproxy: cluster names and addresses go through ktctl connect; everything else is DIRECT.
var PROXY = {json.dumps(proxy)};
var ROUTE_ALL = {json.dumps(rules.route_all)};
var DOMAIN = {json.dumps("." + rules.domain)};
var NAMESPACES = {json.dumps(sorted(rules.namespaces))};
var NETS4 = {json.dumps(v4)};
var NETS6 = {json.dumps(v6)};

function ktIsIPv4(h) {{ return /^\\d{{1,3}}(\\.\\d{{1,3}}){{3}}$/.test(h); }}
function ktIsIPv6(h) {{ return h.indexOf(":") >= 0; }}
function ktIsLoopback(h) {{
  return h === "localhost" || h === "localhost.localdomain" || h === "::1" || /^127\\./.test(h);
}}
function ktIsClusterName(h) {{
  if (h.indexOf(".") < 0) return true;
  if (dnsDomainIs(h, DOMAIN)) return true;
  var labels = h.split(".");
  var last = labels[labels.length - 1];
  if (last === "svc" || last === "pod") return true;
  if (labels.length <= 3) {{
    for (var i = 0; i < NAMESPACES.length; i++) if (last === NAMESPACES[i]) return true;
  }}
  return false;
}}
function ktIsClusterIP(h) {{
  if (ktIsIPv4(h)) {{
    for (var i = 0; i < NETS4.length; i++) if (isInNet(h, NETS4[i][0], NETS4[i][1])) return true;
    return false;
  }}
  if (typeof isInNetEx === "function") {{
    for (var j = 0; j < NETS6.length; j++) if (isInNetEx(h, NETS6[j])) return true;
  }}
  return false;
}}
function FindProxyForURL(url, host) {{
  host = host.toLowerCase().replace(/\\.$/, "");
  if (host.charAt(0) === "[") host = host.substring(1, host.length - 1);
  if (ktIsLoopback(host)) return "DIRECT";
  if (ROUTE_ALL) return PROXY;
  if (ktIsIPv4(host) || ktIsIPv6(host)) return ktIsClusterIP(host) ? PROXY : "DIRECT";
  return ktIsClusterName(host) ? PROXY : "DIRECT";
}}
"""
