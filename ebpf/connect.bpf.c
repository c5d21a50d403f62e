/* cgroup/connect4: send a meshed app's outbound connections straight to its
 * proxy's outbound listener, recording where each was meant to go for
 * getsockopt(SO_ORIGINAL_DST). A proxy's connections to a same-node meshed pod
 * are not rewritten (see below), only remembered so sockops can splice them. */
#include "merbridge.h"

static __always_inline int current_is_proxy(void)
{
    __u64 uid_gid = bpf_get_current_uid_gid();
    return (__u32)uid_gid == MESH_PROXY_UID || (__u32)(uid_gid >> 32) == MESH_PROXY_GID;
}

static __always_inline int remember_original_dst(struct bpf_sock_addr *ctx, __u32 ip, __u16 port, __u16 flags)
{
    __u64 cookie = socket_cookie64(ctx);
    struct original_dst dst = {.ip = ip, .port = port, .flags = flags};
    if (connect_original_dst.update(&cookie, &dst) != 0) {
        count(CNT_ERR_MAP_UPDATE, 1);
        return -1;
    }
    return 0;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
    if (dns_connect4(ctx))
        return 1;   /* a captured DNS lookup, sent to the DNS proxy (dns_sendmsg.bpf.c) */
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_policy *self = pod_policy.lookup(&netns);
    if (!self)
        return 1;   /* not an accelerated pod: iptables (if any) handles it */

    __u32 dst_ip = ctx->user_ip4;
    __u16 dst_port = bpf_ntohs((__u16)ctx->user_port);
    /* Istio returns loopback traffic of apps (-o lo), and a proxy calling its
     * own pod IP goes through iptables' ISTIO_IN_REDIRECT: leave both alone. */
    if (is_loopback(dst_ip) || dst_ip == self->pod_ip)
        return 1;

    if (!current_is_proxy()) {
        if (!outbound_captured(self, dst_ip, dst_port))
            return 1;
        /* Bind the source to the pod IP (the port is still chosen at connect,
         * bpf_bind implies IP_BIND_ADDRESS_NO_PORT): without it every pod's
         * redirected connection would come from 127.0.0.1 and 4-tuples would
         * collide across pods in the original_dst map, so one pod's proxy
         * could be told another pod's destination. When the bind fails (the
         * app bound the socket itself, so it has a port already), the
         * connection is left to iptables, which keys by conntrack instead. */
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = self->pod_ip};
        if (bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src)) != 0) {
            count(CNT_ERR_BIND, 1);
            return 1;
        }
        if (remember_original_dst(ctx, dst_ip, dst_port, 0) != 0)
            return 1;   /* we could not answer SO_ORIGINAL_DST: let iptables do it */
        ctx->user_ip4 = bpf_htonl(MESH_REDIRECT_IP_HOST);
        ctx->user_port = bpf_htons(MESH_OUTBOUND_PORT);
        count(CNT_REDIRECT_OUTBOUND, 1);
        return 1;
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
    __u64 *peer_netns = local_pod_ip.lookup(&dst_ip);
    if (!peer_netns)
        return 1;
    struct pod_policy *peer = pod_policy.lookup(peer_netns);
    if (!peer || dst_port == MESH_INBOUND_PORT || !inbound_captured(peer, dst_port))
        return 1;
    struct datapath_config *cfg = datapath_config();
    int rewrite = cfg && cfg->rewrite_inbound_port;
    if (remember_original_dst(ctx, dst_ip, dst_port, rewrite ? 0 : ODST_VIA_INBOUND_REDIRECT) != 0)
        return 1;
    if (rewrite)
        ctx->user_port = bpf_htons(MESH_INBOUND_PORT);
    count(CNT_REDIRECT_INBOUND, 1);
    return 1;
}
