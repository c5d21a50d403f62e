/* sockops: when a redirected connection is established, record its 4-tuple ->
 * original destination (the proxy asks with the 4-tuple it sees), and put both
 * ends of same-node legs into sock_pairs so sk_msg can splice them. On close,
 * delete what the connection added. */
#include "merbridge.h"

static __always_inline struct sock_tuple own_tuple(struct bpf_sock_ops *skops)
{
    struct sock_tuple t = {
        .local_ip = skops->local_ip4,
        .remote_ip = skops->remote_ip4,
        .local_port = (__u16)skops->local_port,                 /* host order */
        .remote_port = (__u16)bpf_ntohl(skops->remote_port),    /* network order, upper half */
    };
    return t;
}

static __always_inline void splice(struct bpf_sock_ops *skops, struct sock_tuple *t)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || !cfg->splice)
        return;
    /* bcc rewrites map methods into statements: keep the call on its own. */
    long err = sock_pairs.sock_hash_update(skops, t, BPF_ANY);
    if (err == 0)
        count(CNT_SOCKHASH_INSERT, 1);
    else
        count(CNT_ERR_SOCKHASH_INSERT, 1);
}

static __always_inline int pod_is_accelerated(struct bpf_sock_ops *skops)
{
    __u64 netns = bpf_get_netns_cookie(skops);
    return pod_policy.lookup(&netns) != 0;
}

/* Client side: the app (to the outbound listener), the proxy (to a same-node
 * pod, on its way to that pod's inbound listener) or the proxy's inbound leg
 * to its own app (from 127.0.0.6).
 *
 * Keys are chosen so each end finds the other by swapping its own tuple: the
 * proxy-to-pod leg's server end sits on the inbound port after the receiving
 * pod's REDIRECT, so that leg is recorded and inserted under the tuple the
 * receiving proxy sees. */
static __always_inline void active_established(struct bpf_sock_ops *skops)
{
    struct sock_tuple t = own_tuple(skops);
    __u64 cookie = socket_cookie64(skops);
    struct original_dst *dst = connect_original_dst.lookup(&cookie);
    if (dst) {
        struct original_dst copy = *dst;
        connect_original_dst.delete(&cookie);
        if (copy.flags & ODST_VIA_INBOUND_REDIRECT)
            t.remote_port = MESH_INBOUND_PORT;
        if (original_dst.update(&t, &copy) != 0) {
            count(CNT_ERR_MAP_UPDATE, 1);
            return;
        }
        splice(skops, &t);
        return;
    }
    if (t.local_ip == bpf_htonl(MESH_PASSTHROUGH_IP_HOST) && pod_is_accelerated(skops))
        splice(skops, &t);
}

/* Server side: a proxy listener accepting a connection we redirected (its
 * client's 4-tuple is in original_dst), or an app accepting from 127.0.0.6. */
static __always_inline void passive_established(struct bpf_sock_ops *skops)
{
    struct sock_tuple t = own_tuple(skops);
    if (t.local_port == MESH_OUTBOUND_PORT || t.local_port == MESH_INBOUND_PORT) {
        struct sock_tuple client = {
            .local_ip = t.remote_ip, .remote_ip = t.local_ip,
            .local_port = t.remote_port, .remote_port = t.local_port,
        };
        struct original_dst *dst = original_dst.lookup(&client);
        if (dst) {
            /* the client's socket still names the original port */
            if (dst->flags & ODST_VIA_INBOUND_REDIRECT)
                t.local_port = dst->port;
            splice(skops, &t);
        }
        return;
    }
    if (t.remote_ip == bpf_htonl(MESH_PASSTHROUGH_IP_HOST) && pod_is_accelerated(skops))
        splice(skops, &t);
}

int sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET)
        return 0;
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB: {
        /* Only sockets we redirected ask for state callbacks, so that their
         * entries go away on close, also when the connect never completes. */
        __u64 cookie = socket_cookie64(skops);
        if (connect_original_dst.lookup(&cookie))
            bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        break;
    }
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        active_established(skops);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        passive_established(skops);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] == BPF_TCP_CLOSE) {
            /* sock_pairs drops closed sockets by itself; our own maps do not. */
            __u64 cookie = socket_cookie64(skops);
            struct sock_tuple t = own_tuple(skops);
            connect_original_dst.delete(&cookie);
            original_dst.delete(&t);
            t.remote_port = MESH_INBOUND_PORT;   /* a proxy-to-pod leg's record */
            original_dst.delete(&t);
        }
        break;
    }
    return 0;
}
