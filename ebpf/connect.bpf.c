/* cgroup/connect4: send a meshed app's outbound connections straight to its
 * proxy's outbound listener, and a proxy's connections to a same-node meshed
 * pod straight to that pod's inbound listener. Records where each connection
 * was meant to go, for getsockopt(SO_ORIGINAL_DST). */
#include "merbridge.h"

static __always_inline int current_is_proxy(void)
{
    __u64 uid_gid = bpf_get_current_uid_gid();
    return (__u32)uid_gid == MESH_PROXY_UID || (__u32)(uid_gid >> 32) == MESH_PROXY_GID;
}

static __always_inline int remember_original_dst(struct bpf_sock_addr *ctx, __u32 ip, __u16 port)
{
    __u64 cookie = socket_cookie64(ctx);
    struct original_dst dst = {.ip = ip, .port = port};
    if (connect_original_dst.update(&cookie, &dst) != 0) {
        count(CNT_ERR_MAP_UPDATE, 1);
        return -1;
    }
    return 0;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
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
         * collide across pods in the original_dst map. */
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = self->pod_ip};
        if (bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src)) != 0)
            count(CNT_ERR_BIND, 1);
        if (remember_original_dst(ctx, dst_ip, dst_port) != 0)
            return 1;   /* we could not answer SO_ORIGINAL_DST: let iptables do it */
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(MESH_OUTBOUND_PORT);
        count(CNT_REDIRECT_OUTBOUND, 1);
        return 1;
    }

    /* The proxy: only connections to another accelerated pod on this node are
     * ours; anything else (remote pods, services, non-accelerated pods) keeps
     * going through the destination's own iptables rules. */
    __u64 *peer_netns = local_pod_ip.lookup(&dst_ip);
    if (!peer_netns)
        return 1;
    struct pod_policy *peer = pod_policy.lookup(peer_netns);
    if (!peer || dst_port == MESH_INBOUND_PORT || !inbound_captured(peer, dst_port))
        return 1;
    if (remember_original_dst(ctx, dst_ip, dst_port) != 0)
        return 1;
    ctx->user_port = bpf_htons(MESH_INBOUND_PORT);
    count(CNT_REDIRECT_INBOUND, 1);
    return 1;
}
