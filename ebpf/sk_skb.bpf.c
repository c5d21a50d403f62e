/* sk_skb stream verdict: pass every TCP segment a spliced socket receives
 * through the socket's sockmap queue, where FIONREAD counts it.
 *
 * Attached to sock_pairs only on kernels whose probe shows that bytes coming
 * through TCP to a socket in a sockhash are invisible to FIONREAD while
 * redirected ones are visible (6.12.100, 6.18.44: "bpf, sockmap: Fix FIONREAD
 * for sockmap" without its follow-up; merbridge_py/kernel_probes.py,
 * docs/kernel-behaviour.md). A spliced socket receives through TCP when its
 * peer stops redirecting (bulk sender, or a redirect that missed: see
 * sk_msg.bpf.c); with this program those bytes join the queue behind the
 * redirected ones, in order, and an app sizing its reads with FIONREAD sees
 * them. Flow control stays TCP's: the kernel leaves a segment in the TCP
 * receive queue while the socket's receive buffer is full. */
#include "merbridge.h"

int sk_skb_stream_verdict(struct __sk_buff *skb)
{
    return SK_PASS;
}
