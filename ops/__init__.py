"""Operations: the quota-gateway command and the embedded development servers."""
