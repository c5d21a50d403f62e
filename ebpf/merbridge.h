/* Shared structs, limits and maps of the merbridge-py datapath.
 *
 * Every hook's .c file includes this header; the loader compiles them as one
 * unit so the maps exist once. The Python mirror of these structs is
 * merbridge_py/layout.py (tests/test_layout.py checks they agree).
 *
 * Mesh constants (MESH_*) come from the mesh profile as -D defines; what
 * differs between pods (addresses, rules, the proxy's uid) is in pod_policy.
 */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>

#ifndef MESH_OUTBOUND_PORT
#error "MESH_* constants are passed by the loader (merbridge_py/mesh.py)"
#endif

#define MAX_OUTBOUND_RULES 128
#define MAX_INBOUND_RULES 128
#define MAX_PODS 1024
/* per-connection maps; a loader may pass a smaller -DMAX_CONNECTIONS (tests of a full map) */
#ifndef MAX_CONNECTIONS
#define MAX_CONNECTIONS 65536
#endif
#define MAX_DESTINATIONS 4096

/* SO_ORIGINAL_DST from linux/netfilter_ipv4.h and IP6T_SO_ORIGINAL_DST from
 * linux/netfilter_ipv6/ip6_tables.h (both 80); not pulled in to keep includes UAPI-only. */
#define SOL_IP_LEVEL 0
#define SOL_IPV6_LEVEL 41
#define SO_ORIGINAL_DST_OPT 80

/* Addresses of both families, in one shape: 16 bytes, network order, IPv4
 * stored v4-mapped (::ffff:a.b.c.d). An AF_INET6 socket talking to an IPv4
 * peer holds exactly that form, so the two ends of a connection find each
 * other whichever family each socket has (an app's v4-mapped AF_INET6 socket,
 * the proxy's accepted AF_INET one). Compared word by word: the verifier and
 * bcc handle __u32[4] where a 16-byte memcmp would not do. */
struct addr {
    __u32 w[4];
};

/* Policy rules are first-match lists, in the order istio-iptables appends its
 * nat rules for the same annotations; no match means "not captured". This
 * mirrors the iptables chain exactly instead of re-deriving Istio's precedence
 * in C. Addresses are network order, ports host order, port 0 = any port. */
struct outbound_rule {
    __u32 addr;
    __u32 mask;
    __u16 port;
    __u8 capture;
    __u8 pad;
};

/* The same for IPv6 destinations (ip6tables' ISTIO_OUTPUT chain). */
struct outbound_rule6 {
    struct addr addr;
    struct addr mask;
    __u16 port;
    __u8 capture;
    __u8 pad;
};

struct inbound_rule {
    __u16 port;
    __u8 capture;
    __u8 pad;
};

/* The proxy's own connections are never redirected: Istio's rules exempt
 * them by owner (istio-iptables -u/-g), and so does the connect hook, by the
 * uid and gid of the calling process. Per pod, because one node can run pods
 * whose proxies run as different ids (OpenShift gives each namespace its own). */
/* Each family is accelerated on its own: Istio captures IPv6 with ip6tables
 * only for pods with an IPv6 address, and a pod's IPv6 policy may not be
 * known exactly when its IPv4 one is. A family not in `families` is left to
 * the kernel's normal path (Istio's rules, if any) for every connection. */
#define POD_IPV4 1
#define POD_IPV6 2

struct pod_policy {
    __u32 pod_ip;            /* network order */
    __u16 n_outbound;
    __u16 n_inbound;
    __u32 proxy_uid;
    __u32 proxy_gid;
    struct addr pod_ip6;     /* zero without POD_IPV6 */
    __u16 n_outbound6;
    __u16 families;          /* POD_IPV4 | POD_IPV6 */
    struct outbound_rule outbound[MAX_OUTBOUND_RULES];
    struct outbound_rule6 outbound6[MAX_OUTBOUND_RULES];
    struct inbound_rule inbound[MAX_INBOUND_RULES];   /* both families: Istio gives both the same ports */
};

/* A connection seen from one of its ends: addresses as struct addr, ports host
 * order. original_dst keys use the client's view, sock_pairs keys each
 * socket's own view (so a sender finds its peer by swapping the halves). */
struct sock_tuple {
    struct addr local_ip;
    struct addr remote_ip;
    __u16 local_port;
    __u16 remote_port;
};

struct original_dst {
    struct addr ip;  /* v4-mapped for IPv4 destinations */
    __u16 port;      /* host order */
    __u16 flags;     /* ODST_* */
    __u32 pad;
};

/* The connection is a proxy's to a same-node pod; that pod's iptables rule
 * moves it to the inbound listener, so its server end sits on MESH_INBOUND_PORT. */
#define ODST_VIA_INBOUND_REDIRECT 1
/* The client end joined sock_pairs; the server end follows the same decision. */
#define ODST_SPLICED 2

enum splice_policy {
    SPLICE_NEVER = 0,
    SPLICE_ALWAYS = 1,
    SPLICE_ADAPTIVE = 2,   /* not for destinations whose recent connections were all short (sockops.bpf.c) */
};

/* The legs of a meshed request, each learnt on its own (what its connections
 * carried): the app's connection to its proxy, the proxy's to the destination
 * pod, and the receiving proxy's to its own app (from 127.0.0.6), which is on
 * the destination's node and so often the only leg that node sees. */
enum leg {
    LEG_APP = 0,
    LEG_PROXY = 1,
    LEG_INBOUND = 2,
};

/* Connections are learnt per client pod as well (the network namespace of the
 * leg's client end): one pod's burst of short connections must not leave
 * another pod's long-lived connection to the same destination unspliced. */
struct dest_key {
    __u64 netns;     /* netns cookie of the leg's client end */
    struct addr ip;  /* original destination */
    __u16 port;      /* host order */
    __u16 leg;       /* enum leg */
    __u32 pad;
};

struct dest_profile {
    __u32 short_streak;  /* consecutive short connections; a long one removes the entry */
    __u32 pad;
    __u64 last_short_ns; /* when the last short one closed: the verdict expires */
};

/* Runtime switches, one entry in the config array. */
struct datapath_config {
    __u32 splice;               /* enum splice_policy */
    __u32 rewrite_inbound_port; /* 1: the connect hook sends a proxy's connection to a same-node
                                 * pod to its inbound port itself; 0: that pod's Istio rule does */
    __u32 short_msgs;           /* adaptive: a connection whose client end sent fewer messages was short */
    __u32 pad0;
    __u32 short_streak;         /* adaptive: this many short ones in a row and new ones are not spliced */
    __u32 bulk_bytes;           /* a socket sending more than this within bulk_window_ns is bulk */
    __u64 bulk_window_ns;
    __u64 short_memory_ns;      /* adaptive: that verdict holds while the last short one closed less than this ago */
    __u32 backlog_bytes;        /* a sender whose peer holds more unread redirected bytes than this goes to TCP;
                                 * 0: no limit (sk_msg.bpf.c, "Backpressure") */
    __u32 pad1;
};

/* Per spliced socket, in socket-local storage (freed with the socket). */
struct send_state {
    __u64 window_start_ns;
    __u32 window_bytes;
    __u16 bulk;          /* 1: sends go through TCP from now on (bulk sender) */
    __u16 missed;        /* 1: sends go through TCP from now on (a redirect found no peer) */
    __u32 redirected_msgs;  /* messages sk_msg redirected (saturating): adaptive splicing learns from them */
    __u32 backpressure;  /* 1: sends go through TCP from now on (its peer stopped reading) */
};

/* Counters, one slot each in the per-CPU array datapath_counters. */
enum counter {
    CNT_REDIRECT_OUTBOUND = 0,   /* app connect -> local outbound listener */
    CNT_REDIRECT_INBOUND,        /* proxy connect to a same-node pod, spliced to its inbound listener */
    CNT_ORIGINAL_DST_ANSWERED,
    CNT_ORIGINAL_DST_MISS,       /* not ours: the kernel's (conntrack) answer stands */
    CNT_ORIGINAL_DST_REFUSED,    /* would have named the proxy's own listener: answered 127.0.0.1:0 */
    CNT_SPLICE_MSGS,
    CNT_SPLICE_BYTES,
    CNT_SPLICE_MISS,             /* peer not in the sockhash: the socket sends through TCP from then on */
    CNT_SOCKHASH_INSERT,
    CNT_ERR_SOCKHASH_INSERT,
    CNT_ERR_BIND,                /* bpf_bind to the pod IP failed: the connection was left to iptables */
    CNT_ERR_MAP_UPDATE,
    CNT_SPLICE_SKIPPED,          /* sockets not spliced: their destination's connections are short-lived */
    CNT_SPLICE_BULK,             /* spliced sockets switched to TCP: they carry bulk data */
    CNT_PEER_NAME,               /* getpeername of a rewritten connection answered with its original destination */
    CNT_SPLICE_BUSY,             /* sockets not spliced: another program's sockmap holds them (-EBUSY; sockops.bpf.c) */
    CNT_SPLICE_BACKPRESSURE,     /* spliced sockets switched to TCP: their peer held too many unread bytes */
    CNT_MAX,
};

/* Every map is pinned under MB_MAPS_DIR, a directory named after a hash of
 * this header, and reused when it is there already: a new agent (after a crash
 * or during an upgrade) takes over its predecessor's maps instead of starting
 * empty, so connections redirected by the old programs but not yet accepted by
 * the proxy still get their SO_ORIGINAL_DST answer, spliced sockets stay
 * spliced, and a socket that went back to TCP never returns to redirects. A
 * change to this header changes the hash, and the agent starts fresh maps. */
#ifndef MB_MAPS_DIR
#error "MB_MAPS_DIR is passed by the loader (merbridge_py/datapath.py)"
#endif
#define MB_PIN(name) MB_MAPS_DIR "/" #name
#define MB_TABLE(type, key, leaf, name, max) BPF_TABLE_PINNED(type, key, leaf, name, max, MB_PIN(name))

/* pod_policy: which pods are accelerated, keyed by their network namespace's
 * cookie. User space fills it, so a pod knows it is meshed from its first
 * connection on (Merbridge learnt this by failing one connection). */
MB_TABLE("hash", __u64, struct pod_policy, pod_policy, MAX_PODS);
/* local_pod_ip: pod IP (either family, an IPv4 one v4-mapped) -> netns cookie,
 * for "is this destination a pod on this node". */
MB_TABLE("hash", struct addr, __u64, local_pod_ip, 2 * MAX_PODS);
/* connect_original_dst: socket cookie -> where the app meant to go, between
 * connect() and the connection being established. Deleted when consumed or on
 * close; LRU only as a backstop for connects that never reach the TCP stack. */
MB_TABLE("lru_hash", __u64, struct original_dst, connect_original_dst, MAX_CONNECTIONS);
/* original_dst: the redirected connection's 4-tuple -> original destination,
 * read by the proxy's getsockopt(SO_ORIGINAL_DST); deleted when the client closes. */
MB_TABLE("lru_hash", struct sock_tuple, struct original_dst, original_dst, MAX_CONNECTIONS);
/* sock_pairs: sockets keyed by (local, remote) so a sender finds its peer.
 * (bcc's BPF_SOCKHASH, pinned.) */
struct sock_pairs_table_t {
    struct sock_tuple key;
    int leaf;
    int (*update)(struct sock_tuple *, int *);
    int (*delete)(struct sock_tuple *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash:" MB_PIN(sock_pairs))))
struct sock_pairs_table_t sock_pairs = {.max_entries = MAX_CONNECTIONS};
BPF_ANNOTATE_KV_PAIR(sock_pairs, struct sock_tuple, int);
/* send_states: per spliced socket, how fast it sends (bulk detection in
 * sk_msg); socket-local storage, freed with the socket. (bcc's BPF_SK_STORAGE, pinned.) */
struct send_states_table_t {
    int key;
    struct send_state leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" MB_PIN(send_states))))
struct send_states_table_t send_states = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(send_states, int, struct send_state);
/* dest_profiles: how recent connections to a destination went, per leg. */
MB_TABLE("lru_hash", struct dest_key, struct dest_profile, dest_profiles, MAX_DESTINATIONS);
/* inbound_leg_spliced: an entry (value 1) for each inbound leg whose client
 * end (key: its own tuple, from 127.0.0.6) joined sock_pairs; its server end
 * joins only if it finds one (sockops.bpf.c). The other legs carry that in original_dst (ODST_SPLICED).
 * Deleted when the server end reads it or the client end closes; LRU as a
 * backstop for connections whose client end has no close callback. */
MB_TABLE("lru_hash", struct sock_tuple, __u32, inbound_leg_spliced, MAX_CONNECTIONS);
MB_TABLE("array", int, struct datapath_config, config, 1);
/* ---- Backpressure (issue 20; ebpf/sk_msg.bpf.c, ebpf/tcp_bpf_recvmsg.bpf.c) ------
 * peer_backlogs: a spliced socket's own tuple (as in sock_pairs) -> the bytes
 * redirected into its ingress queue and the bytes its reader took out. The
 * sender adds the first (it finds the entry by its peer's tuple), a tracing
 * program on the reader's recvmsg the second. Reset when the socket joins
 * sock_pairs (a reused 4-tuple starts from zero); LRU, so entries of closed
 * sockets age out without a close callback. */
struct peer_backlog {
    __u64 redirected;
    __u64 consumed;
};
MB_TABLE("lru_hash", struct sock_tuple, struct peer_backlog, peer_backlogs, MAX_CONNECTIONS);
/* backlog_keys: a spliced socket's real tuple -> its sock_pairs key, where the
 * two differ (a proxy-to-pod leg is keyed with the ports the other end sees
 * across the receiving pod's REDIRECT, sockops.bpf.c): the reader side finds
 * the socket by what its struct sock says. */
MB_TABLE("lru_hash", struct sock_tuple, struct sock_tuple, backlog_keys, MAX_CONNECTIONS);
MB_TABLE("percpu_array", int, __u64, counters, CNT_MAX);

/* bcc 0.26 declares bpf_get_socket_cookie as returning u32; the kernel returns u64. */
static __u64 (*socket_cookie64)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline void count(__u32 slot, __u64 n)
{
    __u64 *value = counters.lookup(&slot);
    if (value)
        *value += n;   /* per-CPU slot: no atomics needed */
}

static __always_inline int addr_is_v4(const struct addr *a)
{
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline void addr_set_v4(struct addr *a, __u32 ip_net)
{
    a->w[0] = 0;
    a->w[1] = 0;
    a->w[2] = bpf_htonl(0xffff);
    a->w[3] = ip_net;
}

/* From four host-order words (how mesh.py passes IPv6 constants). */
static __always_inline void addr_set_host(struct addr *a, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
    a->w[0] = bpf_htonl(w0);
    a->w[1] = bpf_htonl(w1);
    a->w[2] = bpf_htonl(w2);
    a->w[3] = bpf_htonl(w3);
}

/* A socket's address from its context fields: the IPv4 word for AF_INET,
 * the four IPv6 words otherwise. Callers read every field before choosing
 * (clang would otherwise merge the two branches' context loads into one
 * through a computed pointer, which the verifier rejects). */
static __always_inline void addr_from_ctx(struct addr *a, int is_inet, __u32 ip4, __u32 w0, __u32 w1, __u32 w2,
                                          __u32 w3)
{
    if (is_inet) {
        addr_set_v4(a, ip4);
    } else {
        a->w[0] = w0;
        a->w[1] = w1;
        a->w[2] = w2;
        a->w[3] = w3;
    }
}
/* A context field read here and now, into a register (the empty asm pins the load in place). */
#define CTX_READ(field) ({ __u32 __v = (field); __asm__ __volatile__("" : "+r"(__v)); __v; })
#define ADDR_FROM_CTX(a, is_inet, ctx, f4, f6)                                                  \
    addr_from_ctx((a), (is_inet), CTX_READ((ctx)->f4), CTX_READ((ctx)->f6[0]), CTX_READ((ctx)->f6[1]), \
                  CTX_READ((ctx)->f6[2]), CTX_READ((ctx)->f6[3]))

static __always_inline int addr_eq(const struct addr *a, const struct addr *b)
{
    return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* 127.0.0.0/8 (Istio's -o lo RETURN covers all of it) or ::1. */
static __always_inline int is_loopback(const struct addr *a)
{
    if (addr_is_v4(a))
        return (bpf_ntohl(a->w[3]) >> 24) == 127;
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}

/* The address the proxy's inbound leg comes from: 127.0.0.6, or ::6 for IPv6. */
static __always_inline int is_passthrough(const struct addr *a)
{
    if (addr_is_v4(a))
        return a->w[3] == bpf_htonl(MESH_PASSTHROUGH_IP_HOST);
    struct addr p6 = {};
    addr_set_host(&p6, MESH_PASSTHROUGH_IP6_HOST);
    return addr_eq(a, &p6);
}

static __always_inline struct datapath_config *datapath_config(void)
{
    __u32 zero = 0;
    return config.lookup(&zero);
}

/* First-match walk of a pod's outbound rules, as the ISTIO_OUTPUT chain does. */
static __always_inline int outbound_captured(struct pod_policy *p, __u32 ip_net, __u16 port)
{
    for (int i = 0; i < MAX_OUTBOUND_RULES; i++) {
        if (i >= p->n_outbound)
            break;
        struct outbound_rule *r = &p->outbound[i];
        if ((ip_net & r->mask) == r->addr && (r->port == 0 || r->port == port))
            return r->capture;
    }
    return 0;
}

/* The same over the IPv6 rules (ip6tables' ISTIO_OUTPUT). */
static __always_inline int outbound6_captured(struct pod_policy *p, const struct addr *ip, __u16 port)
{
    for (int i = 0; i < MAX_OUTBOUND_RULES; i++) {
        if (i >= p->n_outbound6)
            break;
        struct outbound_rule6 *r = &p->outbound6[i];
        if ((ip->w[0] & r->mask.w[0]) == r->addr.w[0] && (ip->w[1] & r->mask.w[1]) == r->addr.w[1] &&
            (ip->w[2] & r->mask.w[2]) == r->addr.w[2] && (ip->w[3] & r->mask.w[3]) == r->addr.w[3] &&
            (r->port == 0 || r->port == port))
            return r->capture;
    }
    return 0;
}

/* First-match walk of a pod's inbound rules, as the ISTIO_INBOUND chain does. */
static __always_inline int inbound_captured(struct pod_policy *p, __u16 port)
{
    for (int i = 0; i < MAX_INBOUND_RULES; i++) {
        if (i >= p->n_inbound)
            break;
        struct inbound_rule *r = &p->inbound[i];
        if (r->port == 0 || r->port == port)
            return r->capture;
    }
    return 0;
}

/* ---- Peer names (issue 20; ebpf/getpeername.bpf.c) ----------------------------
 * Istio's REDIRECT rewrites packets, never the socket: an app whose connect
 * was NATed to the proxy still sees the address it connected to in
 * getpeername(). The connect hook rewrites the socket itself, so the socket
 * would show the proxy's listener (127.0.0.2:15001). Each socket whose
 * destination the connect hook rewrote keeps, in socket-local storage, what
 * it asked for and where it was sent instead; getpeername shows the former
 * while the kernel's answer is the latter. Socket-local storage is freed with
 * its socket, so the answer can neither outlive it nor be read by another
 * socket that reuses its 4-tuple; sockets the hook left alone (every socket
 * of the proxy's but its rewritten ones, accepted ones) have no entry. */
struct peer_name {
    struct addr asked_ip;       /* the original destination; v4-mapped for IPv4 */
    struct addr redirected_ip;  /* where the connect hook sent it; v4-mapped for IPv4 */
    __u16 asked_port;           /* host order */
    __u16 redirected_port;      /* host order */
    __u32 pad;
};

/* peer_names: per rewritten socket (bcc's BPF_SK_STORAGE, pinned). */
struct peer_names_table_t {
    int key;
    struct peer_name leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" MB_PIN(peer_names))))
struct peer_names_table_t peer_names = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(peer_names, int, struct peer_name);

/* ---- DNS capture (issue 14; ebpf/dns_*.bpf.c) --------------------------------
 * For pods whose Istio rules capture DNS, the app's DNS to the servers those
 * rules name (or to any address, with capture-all) goes to the agent's DNS
 * proxy on 127.0.0.1:MB_DNS_PROXY_PORT: TCP and connected UDP at connect,
 * unconnected UDP at sendmsg. The socket remembers the server it asked, so
 * recvmsg and getpeername can show that server instead of the proxy (glibc
 * and most resolvers drop a reply from an address they did not ask). */
#define MAX_DNS_SERVERS 8
#define MB_DNS_PORT 53
#define MB_DNS_PROXY_PORT 15053
#define MB_DNS_PROXY_IP_HOST 0x7f000001   /* 127.0.0.1 */

/* dns_policy.flags */
#define DNS_CAPTURE_ALL 1   /* port 53 to any address (istio-cni's CAPTURE_ALL_DNS) */

struct dns_policy {
    __u32 proxy_uid;      /* the proxy's own lookups are never captured (Istio's owner match) */
    __u32 proxy_gid;
    __u32 flags;          /* DNS_* */
    __u32 n_servers;
    __u32 servers[MAX_DNS_SERVERS];   /* network order */
};

/* Where a redirected socket's DNS was meant to go. */
struct dns_origin {
    __u32 ip;     /* network order */
    __u16 port;   /* host order */
    __u16 pad;
};

enum dns_counter {
    DNS_CNT_UDP_CONNECT = 0,     /* connected UDP socket sent to the DNS proxy */
    DNS_CNT_UDP_SENDMSG,         /* unconnected UDP datagram sent to the DNS proxy */
    DNS_CNT_TCP_CONNECT,         /* TCP DNS connection sent to the DNS proxy */
    DNS_CNT_REPLY_SOURCE,        /* a reply's source shown as the original server */
    DNS_CNT_PEER_NAME,           /* getpeername answered with the original server */
    DNS_CNT_PROXY_SKIPPED,       /* the proxy's own DNS, left alone */
    DNS_CNT_ERR_MAP_UPDATE,      /* the origin could not be remembered: left to iptables */
    DNS_CNT_MAX,
};

/* dns_policy: per pod (netns cookie), written by the agent from the decision
 * (policy/dns.py); no entry means port 53 is iptables' business. */
MB_TABLE("hash", __u64, struct dns_policy, dns_policy, MAX_PODS);
/* dns_origins: socket cookie -> the server it asked; LRU, since a UDP socket
 * has no close event here (a resolver's socket lives for one lookup). */
MB_TABLE("lru_hash", __u64, struct dns_origin, dns_origins, MAX_CONNECTIONS);
MB_TABLE("percpu_array", int, __u64, dns_counters, DNS_CNT_MAX);

static __always_inline void dns_count(__u32 slot)
{
    __u64 *value = dns_counters.lookup(&slot);
    if (value)
        *value += 1;
}

/* In ebpf/dns_sendmsg.bpf.c and ebpf/dns_inet6.bpf.c; connect4 and connect6
 * dispatch to them first. Return 1 when the connect was a captured DNS one
 * (and has been redirected). */
static __always_inline int dns_connect4(struct bpf_sock_addr *ctx);
static __always_inline int dns_connect6(struct bpf_sock_addr *ctx);
/* In ebpf/dns_inet6.bpf.c, for recvmsg6 and getpeername6 (getpeername.bpf.c):
 * returns 1 when the address shown is now the DNS server the socket asked. */
static __always_inline int dns_show_origin6(struct bpf_sock_addr *ctx, __u32 counter);
