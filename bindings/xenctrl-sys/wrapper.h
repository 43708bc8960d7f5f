/* The Xen tools headers Castor's bindings are generated from (Xen 4.17, libxen-dev). */
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenguest.h>
#include <xenstore.h>

/* Exported by libxenctrl 4.17 but declared only in its private header (xc_private.h): the
 * page types of a domain's gfns (XEN_DOMCTL_getpageframeinfo3, batches of at most 1024),
 * written over `arr` (XEN_DOMCTL_PFINFO_* in the top bits), as libxc's save uses them. */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);
