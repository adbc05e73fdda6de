#!/usr/bin/env bash
# Turn a fresh Ubuntu instance into a CloudKon worker image: run once, then create the AMI.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: sudo bash ami_setup.sh [--root DIR] [--no-packages]

Turns a fresh Ubuntu instance into a CloudKon worker image. Run it from a checkout of
CloudKon-py, then create an AMI from the instance and pass it to
'scheduler.py --remote --provision --ami AMI_ID'.

It installs Python 3 and boto3 (Ubuntu packages), copies the cloudkon package to
/opt/cloudkon, and adds a cron @reboot entry that starts 'python3 -m cloudkon worker --ec2'
at boot, logging to /var/log/cloudkon-worker.log (rotated daily). Queue and table
names, threads and the idle timeout are not baked in: each instance reads them from
its user data, written by the scheduler that launches it, so one image serves every
scheduler. Running it again gives the same result.

Options:
  --root DIR      install under DIR instead of / (for testing the image layout)
  --no-packages   do not install Ubuntu packages (they are already there)
  -h, --help      show this help
USAGE
}

root=""
install_packages=1
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --root)
            [ $# -ge 2 ] || { echo "ami_setup.sh: --root needs a directory" >&2; exit 2; }
            root=$2
            shift 2
            ;;
        --no-packages) install_packages=0; shift ;;
        *) echo "ami_setup.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
app_dir=/opt/cloudkon
log_file=/var/log/cloudkon-worker.log

if [ "$install_packages" = 1 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ami_setup.sh: run as root (sudo), or pass --no-packages" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q python3 python3-boto3 cron
    systemctl enable cron
fi

install -d -m 0755 "$root$app_dir/cloudkon" "$root/etc/cron.d" "$root/etc/logrotate.d"
# The whole package, as it is (a module left from an older image is removed: the image runs this one).
find "$root$app_dir/cloudkon" -name '*.py' -delete
for module in "$source_dir"/cloudkon/*.py; do
    install -m 0644 "$module" "$root$app_dir/cloudkon/$(basename "$module")"
done

cat > "$root/etc/cron.d/cloudkon-worker" <<CRON
# Start the CloudKon worker when the instance boots (written by ami_setup.sh).
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
@reboot root cd $app_dir && /usr/bin/python3 -m cloudkon worker --ec2 >> $log_file 2>&1
CRON
chmod 0644 "$root/etc/cron.d/cloudkon-worker"

cat > "$root/etc/logrotate.d/cloudkon-worker" <<ROTATE
$log_file {
    daily
    rotate 7
    compress
    missingok
    notifempty
    copytruncate
}
ROTATE
chmod 0644 "$root/etc/logrotate.d/cloudkon-worker"

echo "CloudKon worker installed in $root$app_dir; it starts at boot (cron @reboot)."
