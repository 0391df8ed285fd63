"""The PAC file: the routing rules of ktproxy.routing, translated to JavaScript.

Names are matched with dnsDomainIs and plain string tests only: dnsResolve() or isInNet() on a name
would make the browser resolve it locally first, which fails for cluster names. isInNet is only
called on strict IPv4 literals; IPv6 ranges are matched in the script itself, because isInNetEx
exists in Chromium but not in Firefox. Literals are recognised exactly as Python's ipaddress does, so
the PAC and ClusterRules.via_tunnel agree on every host.
"""

from __future__ import annotations

import ipaddress
import json

from ktproxy.routing import ClusterRules

CONTENT_TYPE = "application/x-ns-proxy-autoconfig"


def _v6_net(net: ipaddress.IPv6Network) -> list[object]:
    groups = [int.from_bytes(net.network_address.packed[i:i + 2], "big") for i in range(0, 16, 2)]
    return [groups, net.prefixlen]


def pac_script(rules: ClusterRules, proxy_host: str, proxy_port: int, *, auth: bool = False) -> str:
    hostport = f"[{proxy_host}]:{proxy_port}" if ":" in proxy_host else f"{proxy_host}:{proxy_port}"
    # Browsers cannot authenticate to a SOCKS5 proxy: with credentials every request would first pay
    # for a failed SOCKS5 attempt, so HTTP proxying (which they can authenticate) comes first.
    proxy = f"PROXY {hostport}; SOCKS5 {hostport}" if auth else f"SOCKS5 {hostport}; PROXY {hostport}"
    # Plain http:// goes to the HTTP proxy first: only there can `mesh --auto-header` add the developer's
    # header (SOCKS passes bytes on unread); https and others keep SOCKS5, one tunnel per connection.
    http_first = f"PROXY {hostport}; SOCKS5 {hostport}"
    v4 = [[str(n.network_address), str(n.netmask)] for n in rules.cidrs if n.version == 4]
    v6 = [_v6_net(n) for n in rules.cidrs if n.version == 6]
    return f"""// ktproxy: cluster names and addresses go through ktctl connect; everything else is DIRECT.
var PROXY = {json.dumps(proxy)};
var HTTP_FIRST = {json.dumps(http_first)};
var ROUTE_ALL = {json.dumps(rules.route_all)};
var DOMAIN = {json.dumps("." + rules.domain)};
var NAMESPACES = {json.dumps(sorted(rules.namespaces))};
var NETS4 = {json.dumps(v4)};
var NETS6 = {json.dumps(v6)};

var KT_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
var KT_V4 = new RegExp("^" + KT_OCTET + "(\\\\." + KT_OCTET + "){{3}}$");
function ktIsIPv4(h) {{ return KT_V4.test(h); }}
// An IPv6 literal as 8 numbers, or null (the same syntax Python's ipaddress accepts).
function ktParse6(h) {{
  if (h.indexOf("%") >= 0) h = h.substring(0, h.indexOf("%"));
  if (!/^[0-9a-f:.]+$/.test(h)) return null;
  var halves = h.split("::");
  if (halves.length > 2) return null;
  function groups(s, v4ok) {{
    var out = [];
    if (s === "") return out;
    var g = s.split(":");
    for (var i = 0; i < g.length; i++) {{
      if (v4ok && i === g.length - 1 && ktIsIPv4(g[i])) {{
        var b = g[i].split(".");
        out.push(parseInt(b[0], 10) * 256 + parseInt(b[1], 10), parseInt(b[2], 10) * 256 + parseInt(b[3], 10));
      }} else if (/^[0-9a-f]{{1,4}}$/.test(g[i])) {{
        out.push(parseInt(g[i], 16));
      }} else {{
        return null;
      }}
    }}
    return out;
  }}
  var a = groups(halves[0], halves.length === 1);
  if (a === null) return null;
  if (halves.length === 1) return a.length === 8 ? a : null;
  var z = groups(halves[1], true);
  if (z === null || a.length + z.length > 7) return null;
  while (a.length + z.length < 8) a.push(0);
  return a.concat(z);
}}
function ktIn6(g, net) {{
  var bits = net[1];
  for (var i = 0; i < 8 && bits > 0; i++, bits -= 16) {{
    var mask = bits >= 16 ? 0xffff : (0xffff << (16 - bits)) & 0xffff;
    if ((g[i] & mask) !== (net[0][i] & mask)) return false;
  }}
  return true;
}}
function ktIsLoopback(h, g6) {{
  if (h === "localhost" || h === "localhost.localdomain") return true;
  if (ktIsIPv4(h)) return h.substring(0, 4) === "127.";
  if (g6 === null) return false;
  for (var i = 0; i < 5; i++) if (g6[i] !== 0) return false;
  if (g6[5] === 0xffff) return (g6[6] >> 8) === 127;  // ::ffff:127.0.0.0/104, v4-mapped loopback
  return g6[5] === 0 && g6[6] === 0 && g6[7] === 1;
}}
function ktIsClusterName(h) {{
  if (h === "") return false;
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
function ktIsClusterIP(h, g6) {{
  if (g6 === null) {{
    for (var i = 0; i < NETS4.length; i++) if (isInNet(h, NETS4[i][0], NETS4[i][1])) return true;
    return false;
  }}
  for (var j = 0; j < NETS6.length; j++) if (ktIn6(g6, NETS6[j])) return true;
  return false;
}}
function FindProxyForURL(url, host) {{
  host = host.toLowerCase();
  if (host.charAt(0) === "[" && host.charAt(host.length - 1) === "]") host = host.substring(1, host.length - 1);
  host = host.replace(/\\.+$/, "");
  var g6 = host.indexOf(":") >= 0 ? ktParse6(host) : null;
  if (ktIsLoopback(host, g6)) return "DIRECT";
  var P = url.substring(0, 5).toLowerCase() === "http:" ? HTTP_FIRST : PROXY;
  if (ROUTE_ALL) return P;
  if (g6 !== null || ktIsIPv4(host)) return ktIsClusterIP(host, g6) ? P : "DIRECT";
  return ktIsClusterName(host) ? P : "DIRECT";
}}
"""
