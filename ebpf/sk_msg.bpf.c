/* sk_msg: hand each message of a spliced socket straight to its peer's
 * receive queue, skipping TCP/IP below the socket layer. */
#include "merbridge.h"

int sk_msg_splice(struct sk_msg_md *msg)
{
    struct sock_tuple peer = {
        .local_ip = msg->remote_ip4,
        .remote_ip = msg->local_ip4,
        .local_port = (__u16)bpf_ntohl(msg->remote_port),  /* network order, upper half */
        .remote_port = (__u16)msg->local_port,             /* host order */
    };
    __u64 size = msg->size;
    long verdict = sock_pairs.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(CNT_SPLICE_MSGS, 1);
        count(CNT_SPLICE_BYTES, size);
    } else {
        count(CNT_SPLICE_MISS, 1);
    }
    /* On a miss the message goes through TCP as usual: never drop data. */
    return SK_PASS;
}
