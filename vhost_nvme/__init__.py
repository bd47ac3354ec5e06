"""nvmetd: vhost_nvme."""
