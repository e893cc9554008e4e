from app import DiffugtsApp

if __name__ == "__main__":
    DiffugtsApp().run()
