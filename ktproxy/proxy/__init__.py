"""connect's local proxy port: SOCKS5 and HTTP (sniffed on one port), the PAC file's endpoint, and the
dialer that sends each destination through the tunnel or direct."""
