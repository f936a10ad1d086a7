#!/usr/bin/env bash
# Fill ROOT with the lab's Debian 12 root tree. Called by build_image.py, which
# runs it inside a private mount namespace (unshare -m): every mount made here
# disappears with the namespace, whatever happens, so the host keeps none.
#
# usage: build-rootfs.sh ROOT MIRROR CACHE REQUIREMENTS CONSTRAINTS PACKAGE...
#   CACHE        a host dir kept between builds: debs/ (apt) and pip/ (wheels)
#   REQUIREMENTS the project's install_requires, one a line
#   CONSTRAINTS  the project's constraints.txt
set -euo pipefail

root=$1 mirror=$2 cache=$3 requirements=$4 constraints=$5
shift 5
packages=("$@")
# Only needed to build libvirt-python from its sdist; purged afterwards.
build_packages=(gcc libc6-dev pkg-config libvirt-dev python3-dev)

step() { printf '== %s %s\n' "$(date +%T)" "$*"; }
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

mkdir -p "$cache/debs" "$cache/pip"

step "debootstrap bookworm (minbase) from $mirror"
debootstrap --variant=minbase --cache-dir="$cache/debs" bookworm "$root" "$mirror"

step "configure apt and dpkg"
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
# No daemons start inside the chroot; no docs, man pages or translations.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cat >"$root/etc/dpkg/dpkg.cfg.d/01-lab-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/01-lab-norecommends"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# virtio-blk for the root disk, forced into the initramfs and loaded early
# (MODULES=most would pick them too); 9p comes from the root fs later.
mkdir -p "$root/etc/initramfs-tools"
printf 'virtio_pci\nvirtio_blk\n' >>"$root/etc/initramfs-tools/modules"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount --bind "$cache/debs" "$root/var/cache/apt/archives"
mkdir -p "$root/root/.cache/pip"
mount --bind "$cache/pip" "$root/root/.cache/pip"

step "apt-get install ${packages[*]}"
in_root apt-get update -q
# confold: keep the initramfs modules file written above.
in_root apt-get install -y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef \
  -o Dpkg::Options::=--force-confold "${packages[@]}" "${build_packages[@]}"

step "libvirt: qemu as root, no security driver; the users the qemu driver resolves"
in_root sh -c 'getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu'
mkdir -p "$root/etc/libvirt" "$root/var/log/libvirt"
cat >>"$root/etc/libvirt/qemu.conf" <<'EOF'

# storage lab: no AppArmor/SELinux, qemu runs as root
user = "root"
group = "root"
security_driver = "none"
EOF

step "virtualenv /opt/hostagent with the project's dependencies"
cp "$requirements" "$root/tmp/lab-requirements.txt"
cp "$constraints" "$root/tmp/lab-constraints.txt"
# The host's CA bundle: PyPI may be reached through a TLS-inspecting proxy
# whose CA only the host trusts.
cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/lab-host-ca.crt"
in_root python3 -m venv /opt/hostagent
# (PIP_CERT rather than --cert: pip's build-isolation subprocess needs it too)
in_root env PIP_CERT=/tmp/lab-host-ca.crt /opt/hostagent/bin/pip install -q \
  --disable-pip-version-check -c /tmp/lab-constraints.txt -r /tmp/lab-requirements.txt
# The project itself comes fresh from the 9p share at every boot.
site=$(echo "$root"/opt/hostagent/lib/python3*/site-packages)
echo /lab/share/src >"$site/hostagent-lab-src.pth"
rm -f "$root/tmp/lab-requirements.txt" "$root/tmp/lab-constraints.txt"

step "purge build-only packages"
in_root apt-get purge -y -q --autoremove -o Dpkg::Use-Pty=0 "${build_packages[@]}"
in_root /opt/hostagent/bin/python -c 'import libvirt, lxml.etree, os_brick, aiohttp, pydantic'

step "the lab's first-stage init"
mkdir -p "$root/lab/share"
cat >"$root/lab/init" <<'EOF'
#!/bin/sh
# Storage lab, stage 1 (kernel init=): mount the 9p share "lab" and hand over to
# the init2.sh that the host put there for this run. Power off if that fails.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -a virtio_pci 9pnet_virtio 9p
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 lab /lab/share &&
    [ -f /lab/share/init2.sh ]; then
  exec /bin/bash /lab/share/init2.sh
fi
echo "lab: no 9p share 'lab' with an init2.sh; powering off" >/dev/console
echo o >/proc/sysrq-trigger
sleep 60
EOF
chmod 755 "$root/lab/init"
echo lab >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 lab\n::1 localhost\n' >"$root/etc/hosts"
: >"$root/etc/fstab"

step "verify: virtio in the initramfs; 9p, LIO, iSCSI and rbd modules in the tree"
kver=$(basename "$(echo "$root"/lib/modules/*)")
in_root lsinitramfs "/boot/initrd.img-$kver" >"$root/tmp/initrd-files"
for m in virtio_pci virtio_blk; do
  grep -q "/$m\.ko" "$root/tmp/initrd-files" ||
    grep -q "/$m\.ko" "$root/lib/modules/$kver/modules.builtin" ||
    { echo "the initramfs has no $m: the root disk would not be found" >&2; exit 1; }
done
for m in 9p 9pnet_virtio target_core_mod target_core_file iscsi_target_mod iscsi_tcp \
    scsi_transport_iscsi sd_mod virtio_scsi loop configfs rbd libceph dm_multipath; do
  in_root modinfo -k "$kver" "$m" >/dev/null || { echo "kernel $kver has no $m" >&2; exit 1; }
done
echo "kernel $kver; initramfs $(wc -l <"$root/tmp/initrd-files") files, virtio ok"
# krbd: the rbd CLI os-brick runs, and the udev rule that names /dev/rbd/<pool>/<image>
for f in /usr/bin/rbd /usr/bin/ceph-rbdnamer /lib/udev/rules.d/50-rbd.rules /usr/bin/ceph-mon \
    /usr/bin/ceph-osd /usr/bin/monmaptool; do
  [ -e "$root$f" ] || { echo "the image has no $f" >&2; exit 1; }
done
in_root python3 -c 'import rados, rbd' || { echo "the system python has no rados/rbd" >&2; exit 1; }

step "clean up"
# the download caches first: apt-get clean would empty the host's copy
umount "$root/root/.cache/pip" "$root/var/cache/apt/archives"
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root/etc/resolv.conf" "$root"/tmp/* "$root/var/log"/*.log
umount "$root/dev/pts" "$root/dev" "$root/sys" "$root/proc"
step "done"
