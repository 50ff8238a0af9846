// The receiving "guest" of a tap port in benches/vhost-user: drops every
// frame the switch writes into the tap, at the earliest point the kernel
// offers (tun runs a device's XDP program on each frame written to it), so
// what the switch's write() pays for the receiver is as small as a
// vhost-user guest's ring recycle. The kernel counts each drop in the
// device's rx_dropped.
#include <linux/bpf.h>

__attribute__((section("xdp"), used)) int xdp_drop(struct xdp_md *ctx)
{
	(void)ctx;
	return XDP_DROP;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
