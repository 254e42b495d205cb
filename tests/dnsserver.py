"""A tiny authoritative DNS server for tests, on 127.0.0.1 over UDP and TCP.

    with DnsServer({("example.com", "TXT"): ["v=spf1 -all"]}) as srv:
        resolver = make_resolver("127.0.0.1", srv.port)

``records`` maps (name, type) to a list of records; for TXT each record is either a str
(split into 255-byte character-strings when longer) or a list of str giving the exact
character-strings. CNAME records are followed inside the served data. Unknown names get
NXDOMAIN, known names without the asked type an empty NOERROR answer, names in
``servfail`` SERVFAIL. UDP answers larger than the client's payload size (512 without
EDNS) are truncated with TC set, so clients retry over TCP like with a real server.
``records`` and ``servfail`` may be changed while the server runs.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

TxtRecord = str | Sequence[str]
Records = Mapping[tuple[str, str], Sequence[TxtRecord]]

TTL = 300


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.lower().rstrip(".") + ".")


def _chunks(record: TxtRecord) -> list[bytes]:
    if isinstance(record, str):
        data = record.encode()
        return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return [s.encode() for s in record]


class DnsServer:
    def __init__(self, records: Records | None = None, servfail: Iterable[str] = ()) -> None:
        self.records: dict[tuple[str, str], Sequence[TxtRecord]] = dict(records or {})
        self.servfail: set[str] = set(servfail)
        self.host = "127.0.0.1"
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []  # (transport, name, type) received
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # --- lifecycle ---

    def start(self) -> DnsServer:
        udp, tcp = self._bind()
        self.port = udp.server_address[1]
        self._servers = [udp, tcp]
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True, name=f"dnsserver-{type(srv).__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _bind(self) -> tuple[socketserver.UDPServer, socketserver.TCPServer]:
        server = self
        last: OSError | None = None
        for _ in range(20):
            udp = _UDPServer((self.host, 0), _UDPHandler, server)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.host, port), _TCPHandler, server)
            except OSError as e:  # the TCP port is taken: try another UDP port
                udp.server_close()
                last = e
                continue
            return udp, tcp
        raise RuntimeError(f"no free UDP+TCP port pair on {self.host}: {last}")

    # --- answering ---

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        qtype = dns.rdatatype.to_text(q.rdtype)
        with self._lock:
            self.queries.append((transport, q.name.to_text(), qtype))
            records = {(_name(n), t.upper()): v for (n, t), v in self.records.items()}
            servfail = {_name(n) for n in self.servfail}
        if q.name in servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            self._fill(response, q.name, q.rdtype, records)
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = query.payload if query.edns >= 0 else 512
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
        records: dict[tuple[dns.name.Name, str], Sequence[TxtRecord]],
    ) -> None:
        name = qname
        for _ in range(8):  # CNAME chain within our data
            cname = records.get((name, "CNAME"))
            if cname and rdtype != dns.rdatatype.CNAME:
                target = _name(str(cname[0]))
                rrset = dns.rrset.from_text(name, TTL, "IN", "CNAME", target.to_text())
                response.answer.append(rrset)
                name = target
                continue
            break
        wanted = records.get((name, dns.rdatatype.to_text(rdtype)))
        if wanted:
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
            for rec in wanted:
                rd: dns.rdata.Rdata
                if rdtype == dns.rdatatype.TXT:
                    rd = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT,
                                                 _chunks(rec))
                else:
                    rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(rec))
                rrset.add(rd, TTL)
            response.answer.append(rrset)
            return
        # Names that own records, or are ancestors of one (empty non-terminals), exist.
        if not any(owner == name or owner.is_subdomain(name) for owner, _ in records):
            response.set_rcode(dns.rcode.NXDOMAIN)


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, addr: tuple[str, int], handler: type[socketserver.BaseRequestHandler],
                 dns_server: DnsServer) -> None:
        self.dns_server = dns_server
        super().__init__(addr, handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: type[socketserver.BaseRequestHandler],
                 dns_server: DnsServer) -> None:
        self.dns_server = dns_server
        super().__init__(addr, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns_server.answer(data, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(5)
        try:
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                data = _recv_exact(conn, length)
                if data is None:
                    return
                reply = self.server.dns_server.answer(data, "tcp")
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
