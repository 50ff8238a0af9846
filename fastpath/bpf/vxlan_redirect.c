// SPDX-License-Identifier: GPL-2.0
//
// vswitch's XDP program for the uplink. The NIC is shared with the host:
// only VXLAN addressed to our VTEP (IPv4, UDP, destination port as
// configured) goes to the AF_XDP socket of the receiving queue; everything
// else — the host's own traffic, ARP, management, other UDP — passes to the
// kernel untouched. Malformed VXLAN for our VTEP is redirected too, so the
// fast path counts it by reason instead of the kernel dropping it silently.
//
// Both programs are multi-buffer aware ("xdp.frags"): they read only the
// headers, which are in the first buffer, and a frame longer than a page
// (a jumbo underlay) reaches the AF_XDP socket in pieces (XDP_USE_SG)
// instead of being refused at attach (veth) or dropped.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct vtep_config {
	__u32 vtep;      /* our VTEP, network byte order */
	__u16 udp_port;  /* VXLAN port, network byte order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vtep_config);
} config SEC(".maps");

SEC("xdp.frags")
int vxlan_redirect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;
	struct vtep_config *cfg;
	__u32 zero = 0;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
		return XDP_PASS;
	/* Non-first fragments carry no UDP header: leave them to the kernel. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || ip->daddr != cfg->vtep)
		return XDP_PASS;
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > end || udp->dest != cfg->udp_port)
		return XDP_PASS;
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "GPL";

// For VM ports on a veth end: the interface belongs to the VM, so every
// frame it sends goes to the AF_XDP socket of its queue. A frame on a
// queue with no socket (yet) is dropped: the VM's traffic never reaches
// the host's own stack, also not before the switch binds.
SEC("xdp.frags")
int redirect_all(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_DROP);
}
