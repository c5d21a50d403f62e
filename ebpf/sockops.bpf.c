/* sockops: when a redirected connection is established, record its 4-tuple ->
 * original destination (the proxy asks with the 4-tuple it sees), and put both
 * ends of same-node legs into sock_pairs so sk_msg can splice them. On close,
 * delete what the connection added, and learn how much it carried.
 *
 * Splicing a socket has a price paid once per connection (the kernel sets up
 * and tears down its sockmap state) and a gain paid back per message. Short
 * connections never pay it back, so under the adaptive policy a destination
 * whose last short_streak connections each were short gets its new
 * connections unspliced (still redirected, still answered), until a long one
 * closes or no short one has closed for short_memory_ns.
 *
 * "Short" is what the connection did, not how long it lived: its client end
 * sent fewer than short_msgs messages. A lifetime in wall-clock time (this
 * was "under 5 ms") changes its mind with load: the same one-request
 * connection lives 3 ms through Envoy on a quiet node and 15 ms on a busy one
 * (README, "One defect of ours found"). A lifetime in round trips does too,
 * since a one-request connection's life is the proxy's and the app's
 * processing time, not the loopback round trip. The count of sends is the
 * same on a quiet and on a busy node, and for sends of up to one segment the
 * same whether the connection was spliced (sk_msg counts the redirected
 * sends) or not (TCP counts the data segments sent): the measure does not
 * depend on the decision it feeds. (A larger send counts once spliced and
 * once per segment through TCP: a one-request upload of a few segments is
 * short while spliced and long when not, so such a destination's
 * connections are spliced four times in five when they run one after
 * another: four short ones, then one unspliced and long that clears the
 * verdict.) Its blind spot: a connection whose
 * client sends one request and then only receives (a server push, a
 * download) counts as short.
 *
 * Connections are learnt per leg (enum leg): a proxy may pool its upstream
 * connections while the app opens one per request; and per client pod
 * (struct dest_key). The client end of each leg decides, and the server end
 * follows that decision (ODST_SPLICED, inbound_leg_spliced), so a leg is
 * spliced at both ends or at neither.
 *
 * A connection opened while its destination's verdict holds stays unspliced
 * for its whole life, however much it carries: a socket joins sock_pairs only
 * when it is established, since joining mid-stream could let a redirected
 * message overtake bytes still in the peer's TCP receive queue. With a steady
 * stream of short connections from the same pod to the same destination on
 * the same leg, the verdict never expires, so a long-lived connection opened
 * among them runs on TCP (as fast as without splicing, no slower). Other
 * pods, other legs and connections opened after the verdict expired are
 * spliced. */
#include "merbridge.h"

/* An AF_INET6 socket with an IPv4 peer shows its addresses v4-mapped, the
 * form struct addr keeps IPv4 in: both families give the same tuple. */
static __always_inline struct sock_tuple own_tuple(struct bpf_sock_ops *skops)
{
    struct sock_tuple t = {
        .local_port = (__u16)skops->local_port,                 /* host order */
        .remote_port = (__u16)bpf_ntohl(skops->remote_port),    /* network order, upper half */
    };
    int inet = skops->family == AF_INET;
    ADDR_FROM_CTX(&t.local_ip, inet, skops, local_ip4, local_ip6);
    ADDR_FROM_CTX(&t.remote_ip, inet, skops, remote_ip4, remote_ip6);
    return t;
}

/* A redirected connection's client end: the app's (to its proxy's outbound
 * listener on loopback, or on its own pod address for IPv6: connect.bpf.c)
 * or a proxy's (to another pod). */
static __always_inline __u16 leg_of(const struct sock_tuple *t)
{
    return is_loopback(&t->remote_ip) || addr_eq(&t->remote_ip, &t->local_ip) ? LEG_APP : LEG_PROXY;
}

static __always_inline int should_splice(__u64 netns, const struct addr *dst_ip, __u16 dst_port, __u16 leg)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || cfg->splice == SPLICE_NEVER)
        return 0;
    if (cfg->splice == SPLICE_ALWAYS)
        return 1;
    struct dest_key key = {.netns = netns, .ip = *dst_ip, .port = dst_port, .leg = leg};
    struct dest_profile *profile = dest_profiles.lookup(&key);
    /* The verdict expires: a long-lived connection opened after a burst of
     * short ones would otherwise stay unspliced for its whole life. */
    if (profile && profile->short_streak >= cfg->short_streak &&
        bpf_ktime_get_ns() - profile->last_short_ns < cfg->short_memory_ns) {
        count(CNT_SPLICE_SKIPPED, 1);
        return 0;
    }
    return 1;
}

/* -EBUSY (asm-generic/errno-base.h), not included to keep includes UAPI-only. */
#define SOCKHASH_BUSY (-16)

/* 1 if the socket joined sock_pairs. A socket carries one sk_msg program and
 * one stream verdict program: when another program's sockmap or sockhash
 * holds it already with its own (Envoy's sockmap socket interface,
 * OpenTelemetry's eBPF instrumentation), the kernel refuses ours with -EBUSY
 * (net/core/sock_map.c, sock_map_link; the same on 6.1, 6.12 and 6.18). Such
 * a socket is not spliced: its sends run the other program, and a peer of
 * ours that did join finds no entry for it, so the peer's redirect misses
 * and it sends through TCP for good (sk_msg.bpf.c). Counted, not an error. */
static __always_inline int join_sock_pairs(struct bpf_sock_ops *skops, struct sock_tuple *key)
{
    /* backpressure: a reused 4-tuple's unread count starts from zero (sk_msg.bpf.c),
     * and a key that is not the socket's own tuple is findable from it */
    peer_backlogs.delete(key);
    struct sock_tuple own = own_tuple(skops);
    if (own.local_port != key->local_port || own.remote_port != key->remote_port)
        backlog_keys.update(&own, key);
    /* bcc rewrites map methods into statements: keep the call on its own. */
    long err = sock_pairs.sock_hash_update(skops, key, BPF_ANY);
    if (err == 0) {
        count(CNT_SOCKHASH_INSERT, 1);
        return 1;
    }
    count(err == SOCKHASH_BUSY ? CNT_SPLICE_BUSY : CNT_ERR_SOCKHASH_INSERT, 1);
    return 0;
}

static __always_inline int adaptive(void)
{
    struct datapath_config *cfg = datapath_config();
    return cfg && cfg->splice == SPLICE_ADAPTIVE;
}

/* Messages the leg's client end sent: the redirected ones counted by sk_msg
 * (send_state.redirected_msgs), the rest as the data segments TCP sent. */
static __always_inline __u64 messages_sent(struct bpf_sock_ops *skops)
{
    __u64 sent = skops->data_segs_out;
    struct bpf_sock *sk = skops->sk;   /* read once: the verifier tracks the null check on this copy */
    if (sk) {
        struct send_state *st = send_states.sk_storage_get(sk, 0, 0);
        if (st)
            sent += st->redirected_msgs;
    }
    return sent;
}

static __always_inline void learn_connection(struct bpf_sock_ops *skops, const struct addr *dst_ip, __u16 dst_port,
                                             __u16 leg)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || cfg->splice != SPLICE_ADAPTIVE)
        return;
    struct dest_key key = {.netns = bpf_get_netns_cookie(skops), .ip = *dst_ip, .port = dst_port, .leg = leg};
    if (messages_sent(skops) >= cfg->short_msgs) {
        dest_profiles.delete(&key);   /* a long one: splice again */
        return;
    }
    __u64 now = bpf_ktime_get_ns();
    struct dest_profile *profile = dest_profiles.lookup(&key);
    if (profile) {
        /* racy across CPUs, and that is fine for a heuristic */
        if (profile->short_streak < 0xffff)
            profile->short_streak++;
        profile->last_short_ns = now;
    } else {
        struct dest_profile fresh = {.short_streak = 1, .last_short_ns = now};
        dest_profiles.update(&key, &fresh);
    }
}

/* Data this end sent before it was established (TCP Fast Open: in the SYN)
 * went through TCP and may still wait in the peer's TCP receive queue, which
 * the reader drains only after its ingress queue: a redirected message would
 * overtake it (tests/test_byte_order.py, 993 of 1000 connections reordered).
 * Such a connection is not spliced. */
static __always_inline int sent_before_established(struct bpf_sock_ops *skops)
{
    return skops->data_segs_out > 0;
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
 * receiving proxy sees. The client end decides whether the leg is spliced and
 * writes the decision into the record, so both ends always agree. */
static __always_inline void active_established(struct bpf_sock_ops *skops)
{
    struct sock_tuple t = own_tuple(skops);
    __u64 cookie = socket_cookie64(skops);
    struct original_dst *dst = connect_original_dst.lookup(&cookie);
    if (dst) {
        struct original_dst copy = *dst;
        connect_original_dst.delete(&cookie);
        __u16 leg = leg_of(&t);
        if (copy.flags & ODST_VIA_INBOUND_REDIRECT)
            t.remote_port = MESH_INBOUND_PORT;
        int spliced = !sent_before_established(skops) &&
                      should_splice(bpf_get_netns_cookie(skops), &copy.ip, copy.port, leg);
        if (spliced)
            copy.flags |= ODST_SPLICED;
        if (original_dst.update(&t, &copy) != 0) {
            count(CNT_ERR_MAP_UPDATE, 1);
            return;
        }
        if (spliced && !join_sock_pairs(skops, &t)) {
            /* Not spliced after all: tell the server end, whose callback
             * reads the record after this one returns (it waits for the ACK
             * this end sends then), so that it stays out of sock_pairs too
             * and receives through TCP as any unspliced socket does. */
            struct original_dst *record = original_dst.lookup(&t);
            if (record)
                record->flags &= ~ODST_SPLICED;
        }
        return;
    }
    /* The inbound leg, proxy -> its own app. It has no original_dst record:
     * its decision goes to inbound_leg_spliced for the server end to follow,
     * and under the adaptive policy this end learns at close what it carried. */
    if (!is_passthrough(&t.local_ip) || !pod_is_accelerated(skops))
        return;
    if (adaptive())
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    __u32 spliced = !sent_before_established(skops) &&
                    should_splice(bpf_get_netns_cookie(skops), &t.remote_ip, t.remote_port, LEG_INBOUND) &&
                    join_sock_pairs(skops, &t);
    if (spliced)
        inbound_leg_spliced.update(&t, &spliced);
    else
        inbound_leg_spliced.delete(&t);   /* one a connection with the same 4-tuple may have left behind */
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
        if (dst && (dst->flags & ODST_SPLICED)) {
            /* the client's socket still names the original port */
            if (dst->flags & ODST_VIA_INBOUND_REDIRECT)
                t.local_port = dst->port;
            join_sock_pairs(skops, &t);
        }
        return;
    }
    /* The inbound leg's server end follows its client end, whose callback ran
     * before this one (this end is established by the ACK the client end
     * sends after its own callback). Deciding here on our own could disagree
     * with it: a short connection closing in between changes the verdict. */
    if (!is_passthrough(&t.remote_ip))
        return;
    struct sock_tuple client = {
        .local_ip = t.remote_ip, .remote_ip = t.local_ip,
        .local_port = t.remote_port, .remote_port = t.local_port,
    };
    if (!inbound_leg_spliced.lookup(&client))
        return;
    inbound_leg_spliced.delete(&client);
    join_sock_pairs(skops, &t);
}

/* A socket we redirected is closing: forget its records (sock_pairs drops
 * closed sockets by itself; our own maps do not), learning what it carried. */
static __always_inline void closed(struct bpf_sock_ops *skops)
{
    __u64 cookie = socket_cookie64(skops);
    connect_original_dst.delete(&cookie);
    struct sock_tuple t = own_tuple(skops);
    if (is_passthrough(&t.local_ip)) {   /* an inbound leg's client end */
        inbound_leg_spliced.delete(&t);   /* if its server end never read it */
        learn_connection(skops, &t.remote_ip, t.remote_port, LEG_INBOUND);
        return;
    }
    __u16 leg = leg_of(&t);
    struct original_dst *dst = original_dst.lookup(&t);
    if (!dst) {
        t.remote_port = MESH_INBOUND_PORT;   /* a proxy-to-pod leg's record */
        dst = original_dst.lookup(&t);
    }
    if (dst) {
        learn_connection(skops, &dst->ip, dst->port, leg);
        original_dst.delete(&t);
    }
}

int sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET && skops->family != AF_INET6)
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
        if (skops->args[1] == BPF_TCP_CLOSE)
            closed(skops);
        break;
    }
    return 0;
}
