module berth/bench/ingress-backend

go 1.19
