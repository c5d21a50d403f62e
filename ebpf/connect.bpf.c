/* cgroup/connect4 and cgroup/connect6: send a meshed app's outbound
 * connections straight to its proxy's outbound listener, recording where each
 * was meant to go for getsockopt(SO_ORIGINAL_DST). A proxy's connections to a
 * same-node meshed pod are not rewritten (see below), only remembered so
 * sockops can splice them.
 *
 * An AF_INET6 socket connecting to an IPv4 address (::ffff:a.b.c.d, as the
 * JVM's sockets do) reaches connect6, not connect4; its packets are IPv4 and
 * Istio's iptables (not ip6tables) rules would take them, so it follows the
 * pod's IPv4 policy. Native IPv6 destinations follow the pod's IPv6 policy. */
#include "merbridge.h"

/* What the connect hook did with one connection. */
enum connect_action {
    CONNECT_LEFT = 0,        /* left as it is */
    CONNECT_TO_OUTBOUND,     /* the caller rewrites it to the outbound listener */
    CONNECT_TO_INBOUND_PORT, /* the caller rewrites its port to the inbound listener's */
};

/* Istio's rules skip the proxy's traffic with `-m owner --uid-owner U` and
 * `--gid-owner G` (either one matching), with this pod's U and G. */
static __always_inline int current_is_proxy(struct pod_policy *self)
{
    __u64 uid_gid = bpf_get_current_uid_gid();
    return (__u32)uid_gid == self->proxy_uid || (__u32)(uid_gid >> 32) == self->proxy_gid;
}

static __always_inline int remember_original_dst(struct bpf_sock_addr *ctx, const struct addr *ip, __u16 port,
                                                 __u16 flags)
{
    __u64 cookie = socket_cookie64(ctx);
    struct original_dst dst = {.ip = *ip, .port = port, .flags = flags};
    if (connect_original_dst.update(&cookie, &dst) != 0) {
        count(CNT_ERR_MAP_UPDATE, 1);
        return -1;
    }
    return 0;
}

/* What the socket asked for and where it goes instead, so getpeername can
 * show the former (ebpf/getpeername.bpf.c; Istio's NAT never changes what a
 * socket shows). Without the entry the connection is not rewritten. */
static __always_inline int remember_peer_name(struct bpf_sock_addr *ctx, const struct addr *asked, __u16 asked_port,
                                              const struct addr *redirected, __u16 redirected_port)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return -1;
    struct peer_name *name = peer_names.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!name) {
        count(CNT_ERR_MAP_UPDATE, 1);
        return -1;
    }
    name->asked_ip = *asked;
    name->asked_port = asked_port;
    name->redirected_ip = *redirected;
    name->redirected_port = redirected_port;
    return 0;
}

/* A connect left alone: a socket may connect again after a failed attempt
 * that was rewritten, and must not keep that attempt's peer name. */
static __always_inline void forget_peer_name(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (sk && ctx->protocol == IPPROTO_TCP)
        peer_names.sk_storage_delete(sk);
}

/* Bind the source to the pod's address of the destination's family (the port
 * is still chosen at connect, bpf_bind implies IP_BIND_ADDRESS_NO_PORT):
 * without it every pod's redirected connection would come from loopback and
 * 4-tuples would collide across pods in the original_dst map, so one pod's
 * proxy could be told another pod's destination. An AF_INET6 socket bound to
 * ::ffff:<pod IPv4> still connects over IPv4. */
static __always_inline int bind_to_pod(struct bpf_sock_addr *ctx, struct pod_policy *self, int v4)
{
    if (ctx->family == AF_INET) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = self->pod_ip};
        return bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src));
    }
    struct sockaddr_in6 src6 = {.sin6_family = AF_INET6};
    struct addr a = self->pod_ip6;
    if (v4)
        addr_set_v4(&a, self->pod_ip);
    src6.sin6_addr.in6_u.u6_addr32[0] = a.w[0];
    src6.sin6_addr.in6_u.u6_addr32[1] = a.w[1];
    src6.sin6_addr.in6_u.u6_addr32[2] = a.w[2];
    src6.sin6_addr.in6_u.u6_addr32[3] = a.w[3];
    return bpf_bind(ctx, (struct sockaddr *)&src6, sizeof(src6));
}

/* The decision shared by both hooks; `dst` is v4-mapped for IPv4. For
 * CONNECT_TO_OUTBOUND, `to` is where the outbound listener is reached:
 * MESH_REDIRECT_IP (v4-mapped for an AF_INET6 socket) for IPv4, and the pod's
 * own IPv6 address for IPv6. Not [::1], where ip6tables' REDIRECT sends
 * them: a connection's conntrack entry outlives it (TIME_WAIT), and an
 * eBPF-mode connection whose tuple is the inverse of an iptables-mode
 * entry's reply tuple ([::1]:15001 -> pod:port) gets its source port
 * silently remapped, so the proxy's SO_ORIGINAL_DST lookup misses (the
 * 127.0.0.2 of IPv4, mesh.py). An IPv6 namespace has no second loopback
 * address; no iptables-mode entry ever names the pod's own address and the
 * outbound port, and Istio's `-o lo -m owner ! --uid-owner` RETURN leaves
 * the connection alone. The proxy's [::]:15001 listener accepts it. */
/* Destinations the kernel routes over lo, where Istio's -o lo rules decide:
 * loopback, the unspecified address (connect() turns 0.0.0.0 and :: into
 * loopback) and the IPv6 passthrough source ::6 (on lo in meshed pods). */
static __always_inline int routed_over_lo(const struct addr *a)
{
    if (is_loopback(a) || is_passthrough(a))
        return 1;
    if (addr_is_v4(a))
        return a->w[3] == 0;
    return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

static __always_inline int connect_common(struct bpf_sock_addr *ctx, const struct addr *dst, __u16 dst_port,
                                          struct addr *to)
{
    if (ctx->protocol != IPPROTO_TCP)
        return CONNECT_LEFT;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_policy *self = pod_policy.lookup(&netns);
    if (!self)
        return CONNECT_LEFT;   /* not an accelerated pod: iptables (if any) handles it */

    int v4 = addr_is_v4(dst);
    if (!(self->families & (v4 ? POD_IPV4 : POD_IPV6)))
        return CONNECT_LEFT;   /* that family stays with Istio's rules for this pod */
    /* Istio returns loopback traffic of apps (-o lo), and a proxy calling its
     * own pod IP goes through iptables' ISTIO_IN_REDIRECT: leave both alone. */
    if (routed_over_lo(dst) || (v4 ? dst->w[3] == self->pod_ip : addr_eq(dst, &self->pod_ip6)))
        return CONNECT_LEFT;

    if (!current_is_proxy(self)) {
        int captured = v4 ? outbound_captured(self, dst->w[3], dst_port) : outbound6_captured(self, dst, dst_port);
        if (!captured)
            return CONNECT_LEFT;
        /* When the bind fails (the app bound the socket itself, so it has a
         * port already), the connection is left to iptables, which keys by
         * conntrack instead. */
        if (bind_to_pod(ctx, self, v4) != 0) {
            count(CNT_ERR_BIND, 1);
            return CONNECT_LEFT;
        }
        if (v4)
            addr_set_v4(to, bpf_htonl(MESH_REDIRECT_IP_HOST));
        else
            *to = self->pod_ip6;
        /* Either record missing, and the app would see the difference: let iptables do it. */
        if (remember_peer_name(ctx, dst, dst_port, to, MESH_OUTBOUND_PORT) != 0 ||
            remember_original_dst(ctx, dst, dst_port, 0) != 0)
            return CONNECT_LEFT;
        count(CNT_REDIRECT_OUTBOUND, 1);
        return CONNECT_TO_OUTBOUND;
    }

    /* The proxy connecting to another accelerated pod on this node, on a port
     * that pod's rules capture. By default the destination is left as it is:
     * the receiving pod's own ISTIO_INBOUND rule moves it to the inbound
     * listener, exactly as in iptables mode (that rule fires for the SYN
     * either way, even for one sent straight to the inbound port). A
     * connection rewritten to the inbound port here would have the same reply
     * tuple as an iptables-mode one from the same source port still in
     * conntrack TIME_WAIT, and netfilter drops such a clashing SYN. For pods
     * without inbound rules, the rewrite can be switched on. */
    __u64 *peer_netns = local_pod_ip.lookup((struct addr *)dst);
    if (!peer_netns)
        return CONNECT_LEFT;
    struct pod_policy *peer = pod_policy.lookup(peer_netns);
    if (!peer || !(peer->families & (v4 ? POD_IPV4 : POD_IPV6)) || dst_port == MESH_INBOUND_PORT ||
        !inbound_captured(peer, dst_port))
        return CONNECT_LEFT;
    struct datapath_config *cfg = datapath_config();
    int rewrite = cfg && cfg->rewrite_inbound_port;
    /* Rewritten, the proxy's socket shows the port it asked for, as under the
     * pod's REDIRECT rule. Rewritten even when that cannot be recorded (counted):
     * a pod whose inbound capture is ours alone has no rule to fall back on. */
    if (rewrite)
        remember_peer_name(ctx, dst, dst_port, dst, MESH_INBOUND_PORT);
    if (remember_original_dst(ctx, dst, dst_port, rewrite ? 0 : ODST_VIA_INBOUND_REDIRECT) != 0)
        return CONNECT_LEFT;
    count(CNT_REDIRECT_INBOUND, 1);
    return rewrite ? CONNECT_TO_INBOUND_PORT : CONNECT_LEFT;
}

/* Both hooks first offer the connection to DNS capture (TCP and connected UDP
 * to port 53, ebpf/dns_*.bpf.c): one program per hook, so the order between
 * the DNS redirect and the mesh redirect is fixed here rather than by attach
 * order. */
int sock4_connect(struct bpf_sock_addr *ctx)
{
    if (dns_connect4(ctx))
        return 1;   /* a captured DNS lookup, sent to the DNS proxy (dns_sendmsg.bpf.c) */
    struct addr dst = {}, to = {};
    addr_set_v4(&dst, ctx->user_ip4);
    int action = connect_common(ctx, &dst, bpf_ntohs((__u16)ctx->user_port), &to);
    if (action == CONNECT_TO_OUTBOUND) {
        ctx->user_ip4 = to.w[3];
        ctx->user_port = bpf_htons(MESH_OUTBOUND_PORT);
    } else if (action == CONNECT_TO_INBOUND_PORT) {
        ctx->user_port = bpf_htons(MESH_INBOUND_PORT);
    } else {
        forget_peer_name(ctx);
    }
    return 1;
}

int sock6_connect(struct bpf_sock_addr *ctx)
{
    if (dns_connect6(ctx))
        return 1;   /* a v4-mapped DNS lookup, sent to the DNS proxy (dns_inet6.bpf.c) */
    struct addr dst = {}, to = {};
    dst.w[0] = ctx->user_ip6[0];
    dst.w[1] = ctx->user_ip6[1];
    dst.w[2] = ctx->user_ip6[2];
    dst.w[3] = ctx->user_ip6[3];
    int action = connect_common(ctx, &dst, bpf_ntohs((__u16)ctx->user_port), &to);
    if (action == CONNECT_TO_OUTBOUND) {
        ctx->user_ip6[0] = to.w[0];
        ctx->user_ip6[1] = to.w[1];
        ctx->user_ip6[2] = to.w[2];
        ctx->user_ip6[3] = to.w[3];
        ctx->user_port = bpf_htons(MESH_OUTBOUND_PORT);
    } else if (action == CONNECT_TO_INBOUND_PORT) {
        ctx->user_port = bpf_htons(MESH_INBOUND_PORT);
    } else {
        forget_peer_name(ctx);
    }
    return 1;
}
