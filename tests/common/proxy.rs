//! A loopback TCP proxy whose link can be cut: every open connection is dropped and new ones
//! are refused until it is restored on the same port. Stands for "the database became
//! unreachable" without stopping the shared PostgreSQL that other tests use.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub port: u16,
    target: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    accept: Option<JoinHandle<()>>,
}

fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(128)
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = listen(0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, _) = watch::channel(true);
        let mut proxy = Proxy {
            port,
            target,
            up: Arc::new(up),
            accept: None,
        };
        proxy.accept = Some(proxy.serve(listener));
        proxy
    }

    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let target = self.target;
        let up = Arc::clone(&self.up);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut down = up.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        })
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&mut self) {
        self.up.send_replace(false);
        if let Some(task) = self.accept.take() {
            task.abort();
        }
    }

    /// Accepts connections again on the same port.
    pub async fn restore(&mut self) {
        self.up.send_replace(true);
        let listener = listen(self.port).expect("re-listen on the proxy port");
        self.accept = Some(self.serve(listener));
    }
}
